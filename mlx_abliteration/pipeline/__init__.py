"""The one end-to-end flow (events, reporter, plan sources) and its steps."""
