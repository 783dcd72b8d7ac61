"""The search page: plain HTML, CSS and JavaScript served at / of the HTTP port."""
