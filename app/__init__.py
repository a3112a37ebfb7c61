"""voxtui's Textual dashboard. Imports from ``engine`` only the protocol and the client."""
