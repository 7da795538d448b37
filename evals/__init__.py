"""evals: the same questions through base, RAG, fine-tuned and hybrid answers, scored and reported.

``python -m evals --help`` lists the commands; docs/evals.md defines every metric.
"""
