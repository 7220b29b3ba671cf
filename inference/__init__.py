"""The model side of the server: settings, loading, the batching engine, parameters, schemas and errors.

It imports neither FastAPI nor Gradio.
"""

__version__ = "0.1.0"
