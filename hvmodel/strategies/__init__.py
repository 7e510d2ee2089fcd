"""Flush strategies, one file each; conf/strategy/*.yaml selects one by `_target_`."""
