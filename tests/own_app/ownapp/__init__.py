"""A user's own Flower app (tests): quickstart-style, with fed-unlearn's strategy on the server."""
