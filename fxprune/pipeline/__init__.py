"""Layer 7: ``fxprune.compile`` — the stages, the measured budget loop, the result and its
report.
"""
