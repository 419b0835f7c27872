"""Text around the model: chat templates in, token ids out as text (never broken UTF-8)."""
