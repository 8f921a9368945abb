"""Users in organizations, passwords, tokens, API keys, the login lockout and its bounds."""
