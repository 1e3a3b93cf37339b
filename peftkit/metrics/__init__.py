"""Offline task metrics, one module per family (classification, tagging, squad, generation).

Each module is plain functions over Python lists; none needs the Hugging Face Hub (``evaluate.load``
fetches its metric scripts from the Hub, so it is not used here).
"""
