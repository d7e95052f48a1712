"""The continuous-learning loop's decisions: policies and their triggers, evaluation requests and promotion."""
