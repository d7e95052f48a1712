"""Infrastructure: the bus (Kafka), the store (MongoDB, GridFS, project scoping), codecs, dead
letters, what code may run, the HTTP guard and the bounds of every listener. Knows nothing of samples,
jobs or models."""
