"""Slots, lockstep batching and the tick loop. Imports the model, never Pipecat."""
