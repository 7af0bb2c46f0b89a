"""Pure tensor math: tensors in, tensors out. Imports only torch and numpy."""
