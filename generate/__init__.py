"""Generation: DDIM sampling of the DisCo model from a person, a background and a pose sequence."""
