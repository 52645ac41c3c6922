"""Relative position biases: ALiBi and T5 buckets, their score_mods for flex attention."""
