"""malaria-edge training side: data ingestion, splits, Keras recipes, evaluation (needs TensorFlow)."""
