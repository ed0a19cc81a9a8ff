"""Multi-dilated CNN speech emotion recognition (Sci. Rep. 2025, 15:8254), reproduced."""
