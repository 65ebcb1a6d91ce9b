"""Interoperability with the Hugging Face ecosystem: export, import and upcycling, lm-evaluation-harness."""
