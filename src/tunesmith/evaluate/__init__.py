"""Multiple-choice benchmarks (`tunesmith eval`)."""
