"""stimloop controller: the loop from samples to safe stimulation commands."""
__version__ = "0.1.0"
