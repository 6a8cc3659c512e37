"""One module per protocol; each only translates its messages to the core and back."""
