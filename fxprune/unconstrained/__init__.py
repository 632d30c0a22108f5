"""Layer 2: unconstrained pruning (UCPE) decisions — per-consumer masks and plans, channel
orders (consecutive ones), the channel layout the rewrite follows, and how each consumer reads
its inputs. Pure functions of an analysis and a plan: nothing here rewrites a graph or times.
"""
