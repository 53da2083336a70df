"""Every setting of a run, its default and its checks: validated once, where the config is built."""
