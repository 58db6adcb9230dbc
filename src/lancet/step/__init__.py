"""The training step as a pure function of (parameters, batch): forward, loss, backward, gradient sync."""
