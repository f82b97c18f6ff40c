"""The bi-level step and its functional unroll: the maths every strategy runs, free of Ray and MLflow."""
