"""End-to-end layer: learning to a measured threshold (checkerboard, digits) and bench scripts
run whole."""
