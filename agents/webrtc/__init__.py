"""A WebRTC agent: the browser talks to MichiAI over SmallWebRTC (aiortc)."""
