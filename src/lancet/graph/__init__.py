"""Analysis of captured step graphs: node roles, reachability, shapes."""
