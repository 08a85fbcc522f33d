"""A Twilio phone bot: TwiML webhook + media-stream WebSocket running MichiAI."""
