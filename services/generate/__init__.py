"""The generate stage: the LLM behind a backend interface (llama.cpp on CPU, exllamav2 on GPU)."""
