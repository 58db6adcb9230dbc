"""Forward partition: token-axis rules, the partition rewrite, and the range search."""
