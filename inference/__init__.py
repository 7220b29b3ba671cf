"""The model side of the server: settings, loading, the batching engine, parameters, what it reports and errors.

It imports neither FastAPI nor Gradio.
"""

__version__ = "0.1.0"
