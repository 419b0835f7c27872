"""The edge agent: serves one bundle with an OpenAI-compatible API, MQTT bridge and metrics."""
