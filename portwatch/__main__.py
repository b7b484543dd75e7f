from portwatch.cli import console

console()
