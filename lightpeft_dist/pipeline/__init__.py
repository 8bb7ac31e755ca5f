"""The stages of a run directory and the stage functions shared by every strategy."""
