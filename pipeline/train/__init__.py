"""The training loop and what it holds: model build, optimizer, loss, EMA, train state, metrics."""
