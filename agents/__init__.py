"""Runnable MichiAI voice agents: a Twilio phone bot and a WebRTC agent."""
