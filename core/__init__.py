"""HeadLab core: model loading, data, evaluation and timing shared by every part of the app.

Plain Python: never imports streamlit, usable from a notebook or the command line.
"""
