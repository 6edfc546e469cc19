"""Streamlit helpers shared by pages: cached loaders, job progress, error boxes. Only pages import this."""
