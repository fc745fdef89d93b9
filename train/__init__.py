"""Training, evaluation and conversion entry points (the ``wuneng`` command)."""
