"""What the supporter, customer and remote-host modules share: server connection, enrollment, module folder."""
