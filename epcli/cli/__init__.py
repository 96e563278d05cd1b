"""The epcli command line (Typer + rich). Commands parse, call one library job, render."""
