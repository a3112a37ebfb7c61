"""voxtui's headless side: data tools, model helpers, training worker and engine.

Nothing in this package imports Textual; heavy libraries (torch, transformers) are imported
inside the functions that need them so that ``voxtui --help`` starts fast.
"""

__version__ = "0.1.0"
