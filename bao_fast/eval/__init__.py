"""Metrics (Score, Pass@U-k, UR), Pareto frontier, plots and reports."""
