"""Infrastructure: the bus (Kafka), the store (MongoDB, GridFS, project scoping), codecs, dead
letters, what code may run, and the HTTP guard. Knows nothing of samples, jobs or models."""
