"""The agent's HTTP face: a thin FastAPI router that maps ``serving``'s results to JSON
responses, SSE streams and status codes, and the middleware that labels every response."""
