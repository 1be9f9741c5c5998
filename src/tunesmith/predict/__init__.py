"""`tunesmith predict`: generate over a dataset and score the predictions."""
