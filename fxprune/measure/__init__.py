"""Layer 5: everything that times models on a backend to decide something — copy and MAC
probes, measured consumer reads, and choosing among export variants by whole-model timing.
"""
