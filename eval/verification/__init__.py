"""Face verification: pair sets, embedding the faces they use, the k-fold metrics, plots, and the
validator the trainer runs (the commands: eval/verify.py, eval/lfw.py, eval/ijb.py)."""
