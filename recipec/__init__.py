"""recipec: a declarative optimization-recipe compiler for LLM inference."""
__version__ = "0.1.0"
