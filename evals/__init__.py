"""evals: tasks (samples + scorers), and the harness that scores strategies on them."""
