"""The chat: conversational RAG chain, memory, Gradio app. ``python -m chatbot --help``."""
