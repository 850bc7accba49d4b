"""Looking inside a model: the singular-value spectrum of its weights and where an adapter's update points
(`spectrum`, `svdtune spectrum`)."""
