"""Face identification: galleries of enrolled people, finding and embedding faces in photos and
videos, the outputs of a search, and the LFW identification figures (the command: eval/identify.py)."""
